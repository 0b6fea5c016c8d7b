"""``python -m dro_plugins.cli`` (and ``accelerate launch -m dro_plugins.cli``, ``torchrun -m dro_plugins.cli``): the
``dro`` command."""

from dro_plugins.cli.main import app

app(prog_name="dro")
