"""The study's database: a URL checked before any trial (one line per mistake), opened for several
processes, and its failures as messages."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from seqtrain.errors import ConfigError, SeqtrainError

if TYPE_CHECKING:
    import optuna


def storage_for(url: str) -> optuna.storages.BaseStorage:
    import optuna

    # Several processes write one SQLite file: wait for the lock instead of failing at once.
    kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


BACKENDS = ("sqlite", "postgresql", "mysql")


# The module a database URL's driver imports -> what to pip install for it.
DRIVERS = {
    "psycopg2": "psycopg2-binary",
    "psycopg": "'psycopg[binary]'",
    "MySQLdb": "mysqlclient (or PyMySQL, with a mysql+pymysql:// URL)",
    "pymysql": "PyMySQL",
    "mysql": "mysql-connector-python",
}


URL_FORMS = (
    "sqlite:///relative/path/study.db or sqlite:////absolute/path/study.db for a file, "
    "postgresql://USER:PASSWORD@HOST/DATABASE or mysql+pymysql://... for several machines"
)


def open_storage(url: str, given: bool) -> tuple[optuna.storages.BaseStorage, str]:
    """The study's storage and the URL to show (no password), checked before any trial: a URL that is
    not one, an unknown database, a missing folder, a file that is not SQLite, a missing driver and a
    database that cannot be opened are each a one-line error. `given`: the user's --storage."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"--storage {url!r} is not a database URL; give {URL_FORMS}.") from None
    shown = parsed.render_as_string(hide_password=True)
    backend = parsed.get_backend_name()
    if backend not in BACKENDS:
        raise ConfigError(
            f"--storage {shown!r}: {backend!r} is not a database tune can use ({', '.join(BACKENDS)}); "
            f"give {URL_FORMS}."
        )
    if backend == "sqlite":
        _check_sqlite_file(parsed.database, shown, given)
    try:
        return storage_for(url), shown
    except ImportError as e:
        module = getattr(e.__cause__, "name", None) or getattr(e, "name", None) or parsed.get_driver_name()
        raise SeqtrainError(
            f"--storage {shown!r} needs the Python module {module!r}, which is not installed: "
            f"pip install {DRIVERS.get(module, module)}."
        ) from None
    except SQLAlchemyError as e:
        raise _storage_error(e, shown) from None


def _check_sqlite_file(database: str | None, shown: str, given: bool) -> None:
    what = f"--storage {shown!r}" if given else "the study database"
    if not database or database == ":memory:":
        raise ConfigError(
            f"{what} is an in-memory database: the study would be lost when tune exits (and --jobs workers "
            "would not share it). Name a file: sqlite:///PATH/study.db."
        )
    path = Path(database)
    if path.is_dir():
        raise ConfigError(f"{what}: {path} is a folder; name a file in it, e.g. sqlite:///{path}/study.db.")
    if not path.parent.is_dir():
        raise ConfigError(
            f"{what}: the folder {path.parent} does not exist. Create it, or fix the path "
            "(sqlite:/// and a relative path, sqlite://// and an absolute one)."
        )
    if path.is_file() and path.stat().st_size:
        try:
            with open(path, "rb") as f:
                head = f.read(16)
        except OSError as e:
            raise SeqtrainError(f"{what}: cannot read {path}: {e.strerror or e}.") from None
        if head != b"SQLite format 3\x00":
            raise SeqtrainError(
                f"{what}: {path} is not an SQLite database (damaged, or another file). Move it away "
                "(a new study starts there) or give another --storage."
            )


def storage_label(url: str) -> str:
    """The URL as messages show it: without its password."""
    from sqlalchemy.engine import make_url

    return str(make_url(url).render_as_string(hide_password=True))


def _storage_error(e: BaseException, shown: str) -> SeqtrainError:
    """A failed read or write of the study's database as a message; a full disk says what to do."""
    from seqtrain.checkpoint import is_disk_full

    cause = e.__cause__ if e.__cause__ is not None else e
    reason = (str(getattr(cause, "orig", None) or cause).strip().splitlines() or [type(cause).__name__])[0]
    if is_disk_full(e):
        return SeqtrainError(
            f"the study database {shown} could not be written: the disk is full ({reason}). Free some disk "
            "space, then run the same `seqtrain tune` command again: the stored trials are kept, and a "
            "trial that was running resumes from its last checkpoint."
        )
    return SeqtrainError(f"the study database {shown} failed: {reason}.")


def _is_storage_error(e: BaseException) -> bool:
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    return isinstance(e, optuna.exceptions.StorageInternalError | SQLAlchemyError)
