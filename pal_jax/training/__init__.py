"""Training: the stage-agnostic loop, the losses, Stage 1, Stage 2, making preference pairs, the Stage 2
reference cache, training-time samples and AOT compilation."""
