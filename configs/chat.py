"""Interactive chat with a persona; shows the selected persona beside each reply.

    python -m pal_jax.main --config=configs/chat.py:tiny --workdir=STAGE1_WORKDIR --config.predict.persona_file=persona.txt
    python -m pal_jax.main --config=configs/chat.py:smollm2_135m --workdir=/tmp/chat --config.predict.persona_file=persona.txt

With a workdir that holds no checkpoint, the smollm2_135m preset chats with the base SmolLM2-135M-Instruct
(init_from=smollm2_gguf), prompted in its ChatML chat format (predict.prompt_format=auto); a pal_jax checkpoint is
prompted with the plain templates it was trained on.
"""

from configs import common


def get_config(preset="tiny"):
    return common.base_config("chat", preset or "tiny")
