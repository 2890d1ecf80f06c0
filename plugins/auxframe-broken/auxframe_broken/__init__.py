"""Deliberately broken auxframe plugins, for auxframe's registry tests only."""
