"""The code location `dg check defs` and `dg dev` load: this repository as a dg project, whose defs folder holds one
`ModelpexComponent` (orchestrator/defs/modelpex/defs.yaml).

N.B. workspace.yaml (`dagster dev`, `modelpex ui`) loads `orchestrator.definitions:defs`, the same definitions
built without the component loader in between.
"""

import dagster as dg

from orchestrator.settings import Settings


@dg.definitions
def defs() -> dg.Definitions:
    return dg.load_from_defs_folder(project_root=Settings.from_env().project)
