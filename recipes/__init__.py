"""Recipes: one file per training method, each a typed Config and a main(cfg) that reads top to bottom."""
