"""cbo: hypergradients of constrained bilevel problems whose inner level is a cvxpy problem.

    prob = cbo.BilevelProblem(inner, parameters=[x], variables=[y], outer=F)
    g = cbo.hypergrad(prob, x_tensor)             # dF/dx by implicit differentiation
"""
from .errors import (
    CboError,
    CboWarning,
    ConvergenceError,
    ConvergenceWarning,
    DegenerateKKTWarning,
    InaccurateSolutionWarning,
    InnerSolveError,
    NonSmoothAtomError,
    ProblemDefinitionError,
    UnsupportedAtomError,
)
from .hypergrad import METHODS as ALL_METHODS
from .hypergrad import HypergradInfo, hypergrad
from .layer import ArgminLayer, LayerInfo
from .linsolve import ADJOINT_SOLVERS, SolveInfo
from .problem import BilevelProblem
from .unroll import UnrollInfo, fixed_point_hypergrad

METHODS = tuple(ADJOINT_SOLVERS)

__version__ = "0.1.0"

__all__ = [
    "BilevelProblem", "hypergrad", "HypergradInfo", "ArgminLayer", "LayerInfo", "SolveInfo", "METHODS", "ALL_METHODS",
    "fixed_point_hypergrad", "UnrollInfo",
    "CboError", "CboWarning", "ConvergenceError", "ConvergenceWarning", "DegenerateKKTWarning",
    "InaccurateSolutionWarning", "InnerSolveError", "NonSmoothAtomError", "ProblemDefinitionError",
    "UnsupportedAtomError",
]
