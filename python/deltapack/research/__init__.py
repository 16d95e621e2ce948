"""The paper's side of deltapack, built on the product and never imported by it: the delta edits and the
Riemann-sum estimator of their loss change (edits, analysis), the model pairs they are measured on (pairs: small
models trained here; pretrained: SmolLM2-135M and Gemma-3-270M fine-tuned here) and their evaluation."""
