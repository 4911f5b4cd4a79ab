"""Fisher measures by parameter perturbation: finite-difference quadratic forms, the perturbed-parameters
context, and the Fisher information sensitivity of the inputs."""
from .finite_differences import fd_quadratic, fd_quadratic_directions, perturbed
from .sensitivity import input_sensitivity, predicted_class_directions

__all__ = ["fd_quadratic", "fd_quadratic_directions", "input_sensitivity", "perturbed", "predicted_class_directions"]
