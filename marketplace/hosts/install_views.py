"""The one-line installer: `/install.sh` (agent/install.sh with this server's URL filled in) and
`/agent/<filename>` (the wheel and systemd unit that `manage.py agent_wheel` put in var/dist/)."""

from __future__ import annotations

import re

from django.conf import settings
from django.http import FileResponse, HttpRequest, HttpResponse, HttpResponseNotFound
from django.views.decorators.http import require_GET

from hearth_agent import __version__ as agent_version
from marketplace.hosts.management.commands.agent_wheel import UNIT_NAME, agent_dist_dir

_SERVABLE = re.compile(r"^(hearth_agent-[A-Za-z0-9_.+-]+-py3-none-any\.whl|" + re.escape(UNIT_NAME) + r")$")


def _wheel_name() -> str:
    built = sorted(agent_dist_dir().glob("hearth_agent-*.whl"))
    return built[-1].name if built else f"hearth_agent-{agent_version}-py3-none-any.whl"


@require_GET
def install_script(request: HttpRequest) -> HttpResponse:
    script = (settings.BASE_DIR / "agent" / "install.sh").read_text(encoding="utf-8")
    server = request.build_absolute_uri("/").rstrip("/")
    script = script.replace("@@HEARTH_SERVER@@", server).replace("@@HEARTH_WHEEL@@", _wheel_name())
    return HttpResponse(script, content_type="text/x-shellscript; charset=utf-8")


@require_GET
def agent_wheel(request: HttpRequest, filename: str) -> HttpResponse | FileResponse:
    path = agent_dist_dir() / filename
    if not _SERVABLE.match(filename) or not path.is_file():
        return HttpResponseNotFound(
            f"{filename} is not available on this server; the operator builds the agent with "
            "`python manage.py agent_wheel`\n",
            content_type="text/plain; charset=utf-8",
        )
    return FileResponse(path.open("rb"), as_attachment=True, filename=filename)
