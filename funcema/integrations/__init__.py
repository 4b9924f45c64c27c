"""Framework integrations: callbacks for Lightning and Hugging Face `Trainer`.

Each lives in its own module and is imported on demand; `import funcema` imports none of them:

- `funcema.integrations.lightning.EMACallback` (install `funcema[lightning]`)
- `funcema.integrations.transformers.EMACallback` (install `funcema[transformers]`)
"""

__all__: list[str] = []
