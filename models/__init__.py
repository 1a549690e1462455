"""Models: open_clip loading (names, hub/local weights, the shipped demo models) and prompt encoding."""
