"""A member whose threshold-BLS signature shares are wrong, for the BLS-Raft tests.

Put this directory first on ``PYTHONPATH`` of a ``nebula start`` child and set
``NEBULA_BAD_SHARE_MARK`` to a file path: that process's
:meth:`nebula.crypto.threshold.KeyShare.sign_share` then signs with a wrong secret (what a
corrupted share in memory, a bug or a malicious member would send), and the hook writes its
pid to the mark file so a test can check it is in place.  Its key file is the real one (the
start-up check passes); only the shares it sends are wrong.  Without the variable nothing
changes; production code is not touched.
"""

from __future__ import annotations

import os

_MARK = os.environ.get("NEBULA_BAD_SHARE_MARK")
if _MARK:
    import nebula.crypto.threshold as _t

    _real = _t.KeyShare.sign_share

    def _bad_sign_share(self, msg, *, h=None, with_partner=None):  # type: ignore[no-untyped-def]
        wrong = _t.KeyShare(self.index, self.secret % (_t.BLS_R - 1) + 1, self.public)
        return _real(wrong, msg, h=h, with_partner=with_partner)

    _t.KeyShare.sign_share = _bad_sign_share  # type: ignore[method-assign]
    with open(_MARK, "w") as f:
        f.write(str(os.getpid()))
