# %% [markdown]
# # Inference with an exported model: onnxruntime and numpy, no torch
# On the training machine, export a finished run (checked against torch there):
#
#     python scripts/export_onnx.py outputs/template-dev
#     python scripts/export_onnx.py outputs/char-lm-dev --int8
#
# Bring the run directory home (scripts/sync_outputs.sh), then on the laptop
# `pip install onnxruntime numpy` is all this file needs. Run it whole or cell by cell.
# TEMPLATE_RUN / CHAR_LM_RUN in the environment point it at other run directories.

# %% Setup: where the exported runs are
import os
import sys
from pathlib import Path

try:
    REPO_ROOT = Path(__file__).resolve().parents[1]  # VS Code's Interactive Window sets __file__
except NameError:  # a plain Jupyter kernel: notebookFileRoot is the repo root
    REPO_ROOT = Path.cwd()
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np

from src.export.inference import OnnxModel, softmax

TEMPLATE_RUN = Path(os.environ.get("TEMPLATE_RUN", REPO_ROOT / "outputs" / "template-dev"))
CHAR_LM_RUN = Path(os.environ.get("CHAR_LM_RUN", REPO_ROOT / "outputs" / "char-lm-dev"))
rng = np.random.default_rng(0)

# %% Template: class probabilities for a few feature vectors
template_path = TEMPLATE_RUN / "model.onnx"
if template_path.is_file():
    model = OnnxModel(template_path)
    print(model)
    num_features = model.inputs[0].shape[1]  # [batch, num_features]
    features = rng.standard_normal((4, num_features)).astype(np.float32)
    probs = model.probs(features)
    print("predicted classes:", probs.argmax(axis=-1).tolist())
    print("probabilities:", np.round(probs.astype(np.float64), 3).tolist())
else:
    print(f"no {template_path}: run python scripts/export_onnx.py {TEMPLATE_RUN}")

# %% Char LM: continue a prompt, one character at a time (int8 model when exported)
lm_path = CHAR_LM_RUN / "model.int8.onnx"
if not lm_path.is_file():
    lm_path = CHAR_LM_RUN / "model.onnx"
if lm_path.is_file():
    lm = OnnxModel(lm_path)
    vocab = lm.metadata.get("vocab")  # characters; id = index + 1, 0 is padding
    if vocab is None:
        print(f"{lm_path.name} has no vocab: {lm.metadata.get('vocab_note')}")
    else:
        block_size = lm.metadata["block_size"]
        prompt = "The trainer "
        ids = [vocab.index(char) + 1 for char in prompt if char in vocab] or [1]
        for _ in range(120):
            logits = lm(np.array(ids[-block_size:]))[-1]  # [T, vocab] -> the last position
            logits[0] = -np.inf  # padding is not text
            next_probs = softmax(logits / 0.8)  # temperature 0.8
            ids.append(int(rng.choice(len(next_probs), p=next_probs)))
        print(f"--- sample from {lm_path.name} ---")
        print("".join(vocab[i - 1] for i in ids))
else:
    print(f"no model.onnx in {CHAR_LM_RUN}: run python scripts/export_onnx.py {CHAR_LM_RUN}")
