"""Model export and the torch-free code that serving shares with training (preprocessing lives here)."""
