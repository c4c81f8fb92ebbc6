"""The base class of errors caused by the user's input (config, data, reward files, model paths).

The entry point prints these without a traceback and exits with status 2; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    pass
