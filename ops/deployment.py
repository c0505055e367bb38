"""Which deployment an operator command talks to.

The ``BACKBONE_*`` environment when it names a Kafka cluster (production, compose, or a shell
that ran ``eval "$(backbone stack env)"``); otherwise the local stack in the default data
directory, so ``backbone status`` works on a developer machine without any set-up.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from eventstore import Settings, load_settings
from ops.environment import stack_settings
from ops.stack import default_stack_dir, stack_info


def command_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``env`` (default: the process environment), else the local stack's."""
    env = os.environ if env is None else env
    if env.get("BACKBONE_KAFKA_BOOTSTRAP"):
        return load_settings(env)
    return stack_settings(stack_info(default_stack_dir()))
