"""The meterproxy command line: every subcommand; argparse lives only here."""
