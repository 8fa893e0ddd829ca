"""`python -m migrator.state --write-sql`: write control_schema.sql again from the revisions in versions/ (after a
revision is added or changed), with alembic's offline mode."""

from __future__ import annotations

import sys

from migrator.state import control

if sys.argv[1:] != ["--write-sql"]:
    sys.exit(f"usage: {control.WRITE_COMMAND}")
control.SCRIPT.write_text(control.offline_script())
print(f"wrote {control.SCRIPT}")
