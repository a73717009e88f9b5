"""One module per hyper-connection variant; importing this package registers all of them in
:mod:`hcdiag.registry` (in display order)."""

from __future__ import annotations

from hcdiag.variants._common import VariantModule
from hcdiag.variants.hc_dynamic import HCDynamic
from hcdiag.variants.hc_static import HCStatic
from hcdiag.variants.identity import IdentitySite
from hcdiag.variants.ihc import IHC
from hcdiag.variants.kromhc import KromHC
from hcdiag.variants.mhc import MHC
from hcdiag.variants.mhc_lite import MHCLite
from hcdiag.variants.tbp import TBP, tbp_chart, tbp_smooth

__all__ = [
    "HCDynamic",
    "HCStatic",
    "IHC",
    "IdentitySite",
    "KromHC",
    "MHC",
    "MHCLite",
    "TBP",
    "VariantModule",
    "tbp_chart",
    "tbp_smooth",
]
