"""Tool-calling data: unified records (`records`), sources (`xlam`, `toolace`, `bfcl`,
`synthetic`) and the Tool-N1 prompt (`prompt`). Import the submodules directly; this package
import stays light (no `datasets` / `transformers` at import time)."""
