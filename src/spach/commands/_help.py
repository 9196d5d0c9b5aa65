"""Help formatting shared by the export / plot / predict commands: the module docstring keeps its line
breaks (so its examples stay one per line) and only meaningful defaults are shown."""
import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):
        if action.default in (None, False) or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def use_help_formatter(parser):
    parser.formatter_class = HelpFormatter
