"""Shared machinery of every engine: argument checks, parameter selection and flat vectors, data
streaming, likelihoods, the forward-pass conventions, memory planning and parameter perturbation.

Private: nothing here is part of the public API, and nothing here imports an engine."""
