"""The Python example of docs/models.md (a user's own transformer under WSN) runs as written and
forgets nothing."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "models.md"


def test_the_own_transformer_example_runs_as_written(capsys):
    text = DOC.read_text()
    match = re.search(r"<!-- example: own-transformer -->\n```python\n(.*?)```", text, re.S)
    assert match, "docs/models.md lost its own-transformer example"
    scope: dict = {"__name__": "docs_models_example"}
    exec(compile(match.group(1), str(DOC), "exec"), scope)
    result = scope["result"]
    assert result.max_logit_change == 0.0 and result.bwt == 0.0
    assert result.acc > 0.8
    assert "largest change of an earlier task's logits: 0.0" in capsys.readouterr().out
