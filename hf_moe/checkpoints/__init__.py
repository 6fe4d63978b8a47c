"""How any model folder is read and written: sources (local, Hub cache, GGUF) and the folder opener (`reading`), the
output-folder resolver and atomic writes (`atomic`), the folder writer (`writing`, `safetensors_writer`), names on disk
(`names`), where a model comes from (`lineage`), and the one model comparison (`compare`). Used by every capability;
imports none of them. Internal: import from its modules."""
