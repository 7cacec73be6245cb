"""The `karma` command line: one entry point, one sub-command group per stage.

Each stage owns its commands in its own module; this file only mounts them. Heavy imports (torch,
transformers, vLLM) happen inside the commands, so `karma --help` is instant.
"""

from __future__ import annotations

import logging

import typer

from karma.data.cli import app as data_app
from karma.demo import demo
from karma.eval.cli import app as eval_app
from karma.experiment.cli import experiment
from karma.rm.cli import app as rm_app
from services.policy_trainer.cli import train
from services.reward_api.cli import serve

app = typer.Typer(
    name="karma",
    help="KARMA: Karma-Aligned Reward Model Adaptation — data, reward model, reward service, PPO, evaluation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(
    data_app, name="data", help="Turn Reddit dumps / SHP rows into karma examples, pairs and splits."
)
app.add_typer(rm_app, name="rm", help="Train, evaluate and compare KARMA reward-model variants.")
app.add_typer(eval_app, name="eval", help="Pragmatics, side-effect and factuality evaluation of a policy.")
app.command("serve", help="Serve reward models over HTTP (FastAPI).")(serve)
app.command("train", help="PPO / RLOO / GRPO a policy against the reward service.")(train)
app.command("experiment", help="The paper's experiment at this machine's scale.")(experiment)
app.command("demo", help="The whole loop on the embedded default models (CPU, loopback).")(demo)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
