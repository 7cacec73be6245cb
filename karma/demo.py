import typer


def demo() -> None:
    """Not built yet."""
    raise typer.Exit("not built yet")
