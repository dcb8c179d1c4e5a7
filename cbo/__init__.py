"""cbo: hypergradients of constrained bilevel problems whose inner level is a cvxpy problem.

    prob = cbo.BilevelProblem(inner, parameters=[x], variables=[y], outer=F)
    g = cbo.hypergrad(prob, x_tensor)             # dF/dx by implicit differentiation
    res = cbo.minimize(prob, x0, outer_constraints=[x >= 0])   # the outer loop
"""
from .errors import (
    CboError,
    CboWarning,
    ConvergenceError,
    ConvergenceWarning,
    DegenerateKKTWarning,
    DivergenceError,
    InaccurateSolutionWarning,
    InnerSolveError,
    NoneInputError,
    NonSmoothAtomError,
    ProblemDefinitionError,
    StrictComplementarityError,
    UnsupportedAtomError,
)
from .conic import ConeStatus
from .driver import OPTIMIZERS, History, MinimizeResult, minimize, plot_history
from .hypergrad import METHODS
from .approximate import PENALTY_METHODS, UNROLLED_METHODS
from .compiled import forget_warm_starts
from .hypergrad import ROUTES, HypergradInfo, hypergrad
from .layer import ArgminLayer, LayerInfo
from .linsolve import ADJOINT_SOLVERS, SolveInfo
from .options import OptionIgnoredWarning, Options
from .problem import BilevelProblem
from .unroll import UnrollInfo, fixed_point_hypergrad

ADJOINT_METHODS = tuple(ADJOINT_SOLVERS)

__version__ = "0.1.0"

__all__ = [
    "BilevelProblem", "hypergrad", "HypergradInfo", "Options", "OptionIgnoredWarning", "forget_warm_starts", "ArgminLayer", "LayerInfo", "SolveInfo", "METHODS", "ADJOINT_METHODS", "UNROLLED_METHODS", "PENALTY_METHODS",
    "fixed_point_hypergrad", "UnrollInfo", "minimize", "MinimizeResult", "History", "plot_history", "OPTIMIZERS", "ROUTES",
    "ConeStatus",
    "CboError", "CboWarning", "ConvergenceError", "ConvergenceWarning", "DegenerateKKTWarning", "DivergenceError",
    "InaccurateSolutionWarning", "InnerSolveError", "NoneInputError", "NonSmoothAtomError", "ProblemDefinitionError",
    "StrictComplementarityError", "UnsupportedAtomError",
]
