"""``python -m model_rollouts.report NAME -o html|png|md`` (the same as ``kubectl mlrollouts report``)."""

from model_rollouts.report.command import main

main()
