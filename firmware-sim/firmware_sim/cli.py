"""The `firmware-sim` command: simulated devices for the edge gateway, one subcommand per transport or mode.

Subcommands are registered explicitly below, one module each (`mqtt_mode.py`, `serial_mode.py`, `social_mode.py`,
`chaos_mode.py`). All of them draw their readings from `signals.py`, so a seed means the same fleet everywhere.
"""

from __future__ import annotations

import click

from firmware_sim.chaos_mode import chaos_command
from firmware_sim.mqtt_mode import mqtt_command
from firmware_sim.serial_mode import serial_command
from firmware_sim.social_mode import social_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edge-gateway", prog_name="firmware-sim")
def main() -> None:
    """Simulated devices for the edge gateway."""


main.add_command(mqtt_command)
main.add_command(serial_command)
main.add_command(social_command)
main.add_command(chaos_command)


if __name__ == "__main__":
    main()
