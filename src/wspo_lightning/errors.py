"""Errors a user can fix: the CLI prints them as one line and exits with code 2."""


class InputError(ValueError):
    """Bad user input: a data file, a config value or a model path.

    The message names where (file, line, field), what was expected and what to do.
    """


def located(path: object, line: int | None, field: str | None, problem: str) -> InputError:
    """Build an InputError whose message starts with `path:line: field 'x':`."""
    where = str(path) + (f":{line}" if line is not None else "")
    what = f" field {field!r}:" if field else ""
    return InputError(f"{where}:{what} {problem}")


class TrainingStopped(RuntimeError):
    """A run stopped on purpose (e.g. a non-finite loss): the message says why, where, and how to go on.

    The CLI prints it as one line and exits with code 1.
    """


def input_error_in(err: BaseException) -> InputError | None:
    """The InputError `err` is or wraps: jsonargparse wraps errors raised while it instantiates classes."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, InputError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None
