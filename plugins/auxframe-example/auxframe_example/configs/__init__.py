"""Recipes of auxframe-example (declared in group auxframe.recipes; `auxframe ls auxframe_example/`)."""
