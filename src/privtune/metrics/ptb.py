"""COCO caption tokenisation, exactly as the official E2E script's scorers see the text.

The Stanford PTBTokenizer jar shipped with pycocoevalcap, run with ``-preserveLines
-lowerCase`` and followed by removal of the COCO punctuation tokens; run once for all
hypotheses and references (one JVM), from a private temporary directory instead of
pycocoevalcap's package directory. METEOR, ROUGE-L and CIDEr read its output.
"""
from __future__ import annotations

import os
import subprocess
import tempfile

# characters that could split a line in the PTB tokenizer or METEOR's stdio protocol
_LINE_BREAKS = str.maketrans({c: " " for c in "\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"})


def ptb_tokenize(java: str, sentences: list[str]) -> list[str]:
    """COCO caption tokenisation (Stanford PTBTokenizer, lower-cased, punctuation removed)."""
    from pycocoevalcap.tokenizer import ptbtokenizer as ptb

    jar = os.path.join(os.path.dirname(os.path.abspath(ptb.__file__)),
                       ptb.STANFORD_CORENLP_3_4_1_JAR)
    punct = set(ptb.PUNCTUATIONS)
    cleaned = [s.translate(_LINE_BREAKS) for s in sentences]
    todo = [i for i, s in enumerate(cleaned) if s.strip()]
    out = [""] * len(sentences)
    if not todo:
        return out
    with tempfile.TemporaryDirectory(prefix="privtune-ptb-") as tmp:
        path = os.path.join(tmp, "sentences.txt")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write("".join(cleaned[i] + "\n" for i in todo))
        proc = subprocess.run(
            [java, "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer",
             "-preserveLines", "-lowerCase", path],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        )
    if proc.returncode != 0:
        raise RuntimeError("PTB tokenizer failed (exit %d): %s"
                           % (proc.returncode, proc.stderr.decode("utf-8", "replace")[-2000:]))
    lines = proc.stdout.decode("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) != len(todo):
        raise RuntimeError(f"PTB tokenizer returned {len(lines)} lines for {len(todo)} sentences")
    for i, line in zip(todo, lines):
        out[i] = " ".join(w for w in line.rstrip().split(" ") if w and w not in punct)
    return out
