"""Inference engines used by the actors: plain classes, usable and tested without Ray."""
