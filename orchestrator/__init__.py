"""modelpex's orchestrator: specs -> build -> store -> run -> transport -> Dagster definitions."""
