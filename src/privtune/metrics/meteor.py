"""METEOR 1.5 (pycocoevalcap, Java) on PTB-tokenised text, scale 0-100 at the caller.

METEOR is run once per call, in one batch, and its JVM is always shut down (and killed after
``METEOR_TIMEOUT_S``).
"""
from __future__ import annotations

import threading

METEOR_TIMEOUT_S = 3600.0  # the METEOR JVM is killed if one call takes longer


def meteor(gts: dict, res: dict) -> float:
    """One batched pycocoevalcap METEOR call; the JVM is always shut down."""
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    proc = scorer.meteor_p
    watchdog = threading.Timer(METEOR_TIMEOUT_S, proc.kill)
    watchdog.daemon = True
    watchdog.start()
    try:
        try:
            score, _ = scorer.compute_score(gts, res)
        except (ValueError, OSError) as exc:  # JVM died: readline() returned b"" etc.
            err = b""
            try:
                proc.kill()
                err = proc.stderr.read()[-2000:]
            except Exception:  # pragma: no cover - best effort diagnostics
                pass
            raise RuntimeError("METEOR (java) failed: %s %s"
                               % (exc, err.decode("utf-8", "replace"))) from exc
    finally:
        watchdog.cancel()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        # Meteor.__del__ re-acquires this lock; after an exception inside compute_score
        # the old one may still be held, which would block garbage collection forever.
        scorer.lock = threading.Lock()
    return float(score)
