"""The admission decision, as the front end imports it; it lives in :mod:`tasks.admission`.

The bulk pump on the workers admits bulk and batch items with the same code,
so the decision moved down into the core; these names keep working.
"""

from __future__ import annotations

from tasks.admission import HTTP_STATUS, Admission, AdmissionRejectedError, Admitted, KeyLike

__all__ = ["HTTP_STATUS", "Admission", "AdmissionRejectedError", "Admitted", "KeyLike"]
