"""Tasks: data sampling, training steps and evaluation protocols, free of any distribution layer."""
