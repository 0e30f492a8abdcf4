"""`python -m teacher_service serve`: flags override DISTILL_* environment variables."""

from __future__ import annotations

import logging

from .config import Settings


def cmd_serve(args) -> int:
    import uvicorn

    from .main import create_app

    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    settings = Settings(**given)
    if settings.host not in ("127.0.0.1", "::1", "localhost"):
        logging.getLogger(__name__).warning("binding %s: reachable from other machines", settings.host)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=10)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the REST teacher service (uvicorn)",
                       description="Every flag can also be set as DISTILL_<NAME> (e.g. DISTILL_STORE=redis://...).")
    for name, f in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_ = (f.description or "") + f" (default: {f.default})"
        if f.annotation is bool:
            p.add_argument(flag, dest=name, action="store_const", const=True, default=None, help=help_)
        else:
            typ = {int: int, float: float}.get(f.annotation, str)
            p.add_argument(flag, dest=name, type=typ, default=None, help=help_)
    p.set_defaults(fn=cmd_serve)
