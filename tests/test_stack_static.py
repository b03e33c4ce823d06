"""Static checks of the production stack (docker-compose.yml, .env and the files they mount), with
no Docker engine: the compose file against the Compose specification and through Debian's
docker-compose, its structure (healthchecks, conditions, pinned images, secrets, volumes,
replicas), nginx's rendered template through `nginx -t`, and the PostgreSQL init script, run twice
on a throw-away cluster with password authentication. What these do not prove (that the
services start and talk to each other) is the native rehearsal's job; see docs/production.md."""
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cvops.testing import need

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
GPU_OVERRIDE = REPO / "docker-compose.gpu.yml"
S3_OVERRIDE = REPO / "docker-compose.s3.yml"
NGINX_TEMPLATE = REPO / "services" / "nginx" / "default.conf.template"
HTPASSWD_SCRIPT = REPO / "services" / "nginx" / "40-dashboard-htpasswd.sh"
INIT_SCRIPT = REPO / "services" / "postgres" / "init-databases.sh"

SERVICES = {"postgres", "migrate", "mlflow", "jupyter", "dl_service", "dashboards", "monitor", "nginx",
            "prometheus", "node-exporter", "grafana", "seaweedfs"}
VOLUMES = {"pgdata", "central_storage", "mlartifacts", "service_var", "grafana_data", "prometheus_data", "seaweedfs_data"}
SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET|ACCESS_KEY", re.IGNORECASE)
# files of issue 12's monitoring part, mounted here; checked once they are in the tree
OTHER_PARTS = ("services/prometheus/", "services/grafana/")


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def dotenv(path: Path = REPO / ".env") -> dict:
    "KEY=VALUE lines of .env (comments and blank lines skipped), as docker-compose reads them."
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip()
    return out


def interpolate(value: str, env: dict) -> str:
    "Compose's interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR?message}, ${VAR:?message}, $VAR, $$."
    def one(m):
        if m.group(0) == "$$": return "$"
        name, op, arg = m.group("name") or m.group("bare"), m.group("op"), m.group("arg") or ""
        val = env.get(name)
        if op in (":-", "-"): return arg if (val is None or (op == ":-" and val == "")) else val
        if op in (":?", "?") and (val is None or (op == ":?" and val == "")): raise KeyError(f"{name}: {arg}")
        return val or ""
    pat = r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|-|:\?|\?)(?P<arg>[^}]*))?\}|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
    return re.sub(pat, one, value)


def environment(service: dict, env: dict) -> dict:
    "A service's environment as the container gets it (list or mapping form, interpolated with `env`)."
    raw = service.get("environment") or {}
    if isinstance(raw, list): raw = dict(item.split("=", 1) for item in raw)
    return {k: interpolate(str(v if v is not None else ""), env) for k, v in raw.items()}


def envsubst(text: str, env: dict) -> str:
    "What the nginx image's templates step does: envsubst of the variables defined in `env` only ($VAR and ${VAR})."
    def one(m):
        name = m.group(1) or m.group(2)
        return env[name] if name in env else m.group(0)
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)", one, text)


def one_shots(c: dict) -> set:
    "Services that others wait for with service_completed_successfully: they run and exit."
    return {dep for s in c["services"].values() for dep, cond in (s.get("depends_on") or {}).items()
            if isinstance(cond, dict) and cond.get("condition") == "service_completed_successfully"}


# --- the compose file against the specification and docker-compose -------------------------------

def test_compose_file_matches_the_compose_specification(tmp_path):
    "check-jsonschema's bundled Compose-spec schema (offline) accepts the stack and the GPU and object-store overrides, and refuses a broken copy."
    exe = Path(sys.executable).parent / "check-jsonschema"
    if not exe.exists(): need("check-jsonschema", "pip install -r requirements.txt -c constraints.txt")
    def check(*files):
        return subprocess.run([str(exe), "--builtin-schema", "vendor.compose-spec", *map(str, files)], capture_output=True, text=True, timeout=120)
    ok = check(COMPOSE, GPU_OVERRIDE, S3_OVERRIDE)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = compose()
    broken["services"]["nginx"]["restart_policy"] = "always"   # not a Compose key (restart is)
    (tmp_path / "docker-compose.yml").write_text(yaml.safe_dump(broken))
    bad = check(tmp_path / "docker-compose.yml")
    assert bad.returncode != 0 and "restart_policy" in bad.stdout + bad.stderr, bad.stdout + bad.stderr


def test_compose_file_is_valid(tmp_path):
    "Debian's docker-compose (no Docker engine needed) parses the file with .env, and stops on a secret missing from .env."
    exe = shutil.which("docker-compose")
    if exe is None: need("docker-compose", "not installed (.ci/run installs it: apt-get install docker-compose)")
    for files in ([], ["-f", "docker-compose.yml", "-f", "docker-compose.gpu.yml"], ["-f", "docker-compose.yml", "-f", "docker-compose.s3.yml"]):
        proc = subprocess.run([exe, *files, "config", "-q"], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
    merged = subprocess.run([exe, "-f", "docker-compose.yml", "-f", "docker-compose.s3.yml", "config"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    services = yaml.safe_load(merged.stdout)["services"]   # the override reaches every process that reads central storage
    for name in ("jupyter", "dl_service", "monitor", "dashboards"):
        env = services[name]["environment"]
        assert env["CVOPS_CENTRAL_STORAGE"] == "s3://cvops/central_storage" and env["S3_ENDPOINT_URL"] == "http://seaweedfs:8333", (name, env)
        assert "DB_URL" in env and "seaweedfs" in services[name]["depends_on"], name   # merged with, not instead of, the base
    assert "s3://cvops/mlflow" in services["mlflow"]["command"]
    shutil.copy(COMPOSE, tmp_path)
    env = {k: v for k, v in dotenv().items() if k != "POSTGRES_PASSWORD"}
    (tmp_path / ".env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    clean = {k: v for k, v in os.environ.items() if k not in dotenv()}
    proc = subprocess.run([exe, "config", "-q"], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=clean)
    assert proc.returncode != 0 and "set POSTGRES_PASSWORD in .env" in proc.stderr, proc.stderr


# --- the structure of the compose file ------------------------------------------------------------

def test_every_service_of_the_stack_is_there():
    c = compose()
    assert set(c["services"]) == SERVICES, set(c["services"]) ^ SERVICES
    assert one_shots(c) == {"migrate"}
    assert c["services"]["migrate"]["command"] == ["cvops", "db", "migrate"]


def test_healthchecks_restart_policies_and_conditions():
    "Every long-running service has a healthcheck, restart: unless-stopped and a stop_grace_period; every depends_on has a condition that fits its target."
    c = compose()
    once = one_shots(c)
    for name, s in c["services"].items():
        if name in once:
            assert s.get("restart") == "no", f"{name}: a one-shot must not restart"
        else:
            hc = s.get("healthcheck") or {}
            assert hc.get("test") and not hc.get("disable"), f"{name}: no healthcheck"
            assert s.get("restart") == "unless-stopped", f"{name}: restart is {s.get('restart')!r}"
            assert re.fullmatch(r"\d+[ms]", str(s.get("stop_grace_period", ""))), f"{name}: no stop_grace_period"
        deps = s.get("depends_on") or {}
        assert isinstance(deps, dict), f"{name}: depends_on without conditions"
        for dep, cond in deps.items():
            assert dep in c["services"], f"{name} depends on unknown {dep}"
            want = "service_completed_successfully" if dep in once else "service_healthy"
            assert cond == {"condition": want}, f"{name} -> {dep}: {cond} (want {want})"


def test_images_are_pinned_and_nothing_pins_a_platform():
    c = compose()
    def platforms(node, where=""):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "platform": yield where
                yield from platforms(v, f"{where}.{k}")
        elif isinstance(node, list):
            for v in node: yield from platforms(v, where)
    assert not list(platforms(c)), list(platforms(c))
    for name, s in c["services"].items():
        if "image" in s:
            image = s["image"]
            m = re.fullmatch(r"[a-z0-9./_-]+:(?P<tag>[A-Za-z0-9._-]+)", image)
            assert m and m["tag"] != "latest" and re.search(r"\d+\.\d+", m["tag"]), f"{name}: image {image!r} is not pinned to a version"
        else:
            dockerfile = REPO / s["build"]["dockerfile"]
            froms = re.findall(r"^FROM\s+(\S+)", dockerfile.read_text(), flags=re.M)
            assert froms and all(re.fullmatch(r"[a-z0-9./_-]+:\d+\.\d+\.\d+[A-Za-z0-9._-]*", f) for f in froms), f"{dockerfile}: {froms}"


def test_secrets_come_from_env_and_never_sit_in_a_url_or_a_command():
    "Every password, token or key is ${VAR?message} (compose stops when .env lacks it); database URLs carry no password; .env holds every variable the file requires."
    c = compose()
    text = COMPOSE.read_text()
    required = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):?\?", text))
    missing = required - set(dotenv())
    assert not missing, f".env lacks {missing}"
    for name, s in c["services"].items():
        for key, value in (s.get("environment") or {}).items():
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{[A-Z][A-Z0-9_]*\?[^}]+\}", str(value)), f"{name}.{key} = {value!r}: use ${{VAR?message}}"
            if key.endswith("_URL") or key.endswith("_URI"):
                assert not re.search(r"://[^/@]*:[^/@]*@", str(value)), f"{name}.{key}: a password in a URL"
        command = " ".join(s.get("command") or []) if isinstance(s.get("command"), list) else str(s.get("command") or "")
        assert not SECRET_NAME.search(command), f"{name}: a secret on the command line: {command}"
        assert not re.search(r"://[^/@\s]*:[^/@\s]*@", command), f"{name}: a password in a URL on the command line"
    assert environment(c["services"]["mlflow"], dotenv())["PGPASSWORD"] == dotenv()["MLFLOW_DB_PASSWORD"]
    assert environment(c["services"]["dl_service"], dotenv())["PGPASSWORD"] == dotenv()["CVOPS_DB_PASSWORD"]


def test_every_tool_connects_as_its_own_role():
    c, env = compose(), dotenv()
    for name in ("migrate", "jupyter", "dl_service", "dashboards", "monitor"):
        url = environment(c["services"][name], env)["DB_URL"]
        assert url == f"postgresql+psycopg2://{env['CVOPS_DB_USER']}@postgres:5432/{env['CVOPS_DB']}", (name, url)
    mlflow = [interpolate(a, env) for a in c["services"]["mlflow"]["command"]]
    store = mlflow[mlflow.index("--backend-store-uri") + 1]
    assert store == f"postgresql+psycopg2://{env['MLFLOW_DB_USER']}@postgres:5432/{env['MLFLOW_DB']}"
    assert env["POSTGRES_USER"] not in (env["CVOPS_DB_USER"], env["MLFLOW_DB_USER"])
    hosts = mlflow[mlflow.index("--allowed-hosts") + 1].split(",")
    assert {"mlflow", "mlflow:5000", "localhost"} <= set(hosts), hosts   # MLflow 3 answers 403 to other Host headers
    assert mlflow[mlflow.index("--artifacts-destination") + 1] == "/mlartifacts"


def test_volumes_replicas_and_production_mode():
    c = compose()
    assert set(c["volumes"]) == VOLUMES
    used = set()
    for name, s in c["services"].items():
        for v in s.get("volumes") or []:
            src = v.split(":")[0] if isinstance(v, str) else v["source"]
            if src.startswith((".", "/")):
                if src.startswith("./") and not (REPO / src).exists() and src[2:].startswith(OTHER_PARTS): continue
                assert src.startswith("/") or (REPO / src).exists(), f"{name}: mounts {src}, which is not in the repository"
            else:
                assert src in c["volumes"], f"{name}: volume {src} is not declared"
                used.add(src)
    assert used == VOLUMES, VOLUMES - used
    assert c["services"]["dl_service"]["deploy"]["replicas"] == 2
    assert "ports" not in c["services"]["dl_service"]   # replicas are reached through nginx only
    for name in ("migrate", "dl_service", "monitor", "dashboards"):
        assert c["services"][name]["environment"]["CVOPS_ENV"] == "production", name
    monitor = c["services"]["monitor"]["environment"]
    assert (monitor["MONITOR_METRICS_HOST"], str(monitor["MONITOR_METRICS_PORT"])) == ("0.0.0.0", "9102")
    gpu = yaml.safe_load(GPU_OVERRIDE.read_text())["services"]["jupyter"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu[0]["capabilities"] == ["gpu"]
    for script in (INIT_SCRIPT, HTPASSWD_SCRIPT, REPO / "services" / "dl_service" / "entrypoint.sh"):
        assert script.stat().st_mode & stat.S_IXUSR, f"{script} is not executable (the images skip or cannot run it)"
    assert "safe.directory /workspace" in (REPO / "services" / "jupyter" / "Dockerfile").read_text()


# --- nginx: the template as the image renders it, through nginx -t --------------------------------

def render_nginx(tmp_path: Path, env: dict | None = None) -> Path:
    "The template rendered as the nginx image would (with the compose environment), upstream names -> 127.0.0.1, in a minimal nginx.conf; returns that file."
    c = compose()
    env = env if env is not None else {"HOSTNAME": "a1b2c3", "HOME": "/root", "PATH": "/usr/bin:/bin", "NGINX_VERSION": "1.27.5",
                                       **environment(c["services"]["nginx"], dotenv())}
    conf = envsubst(NGINX_TEMPLATE.read_text(), env)
    conf = re.sub(r"(?m)^(\s*server\s+)[A-Za-z_][A-Za-z0-9_.-]*:(\d+)", r"\g<1>127.0.0.1:\2", conf)   # nginx -t resolves upstream names
    htpasswd = tmp_path / "htpasswd"
    conf = conf.replace("/etc/nginx/htpasswd", str(htpasswd))
    (tmp_path / "conf.d").mkdir(exist_ok=True)
    (tmp_path / "conf.d" / "default.conf").write_text(conf)
    run = subprocess.run([str(HTPASSWD_SCRIPT)], env={**os.environ, "DASHBOARD_USER": "viewer", "DASHBOARD_PASSWORD": "s3cret-dash",
                                                      "DASHBOARD_HTPASSWD": str(htpasswd)}, capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    temp = "".join(f"    {d}_temp_path {tmp_path}/{d};\n" for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    main = tmp_path / "nginx.conf"
    main.write_text(f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
                    f"http {{\n{temp}    include {tmp_path}/conf.d/*.conf;\n}}\n")
    return main


def nginx_t(main: Path):
    exe = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if exe is None: need("nginx", "Debian's nginx (.ci/run installs it: apt-get install nginx)")
    return subprocess.run([exe, "-t", "-p", str(main.parent), "-e", str(main.parent / "error.log"), "-c", str(main)],
                          capture_output=True, text=True, timeout=60)


def test_nginx_template_renders_and_passes_nginx_t(tmp_path):
    main = render_nginx(tmp_path)
    conf = (tmp_path / "conf.d" / "default.conf").read_text()
    assert "${" not in conf, "a template variable the nginx service does not define"
    proc = nginx_t(main)
    assert proc.returncode == 0, proc.stderr
    assert "syntax is ok" in proc.stderr and "test is successful" in proc.stderr
    # the check can fail: the same harness refuses a rendered file that nginx cannot load
    (tmp_path / "conf.d" / "default.conf").write_text(conf.replace("zone=cvops_api burst", "zone=no_such_zone burst", 1))
    bad = nginx_t(main)
    assert bad.returncode != 0 and "no_such_zone" in bad.stderr, bad.stderr


def block(conf: str, head: str) -> str:
    "The body of the `{ ... }` block that follows `head` (nesting counted)."
    start = conf.index(head)
    i, depth = conf.index("{", start) + 1, 1
    j = i
    while depth:
        depth += {"{": 1, "}": -1}.get(conf[j], 0); j += 1
    return conf[i:j - 1]


def test_nginx_settings(tmp_path):
    "Upstream keep-alive shorter than the service's, client address passed on, rate limits with 429, admin route and /metrics closed, basic auth on /dashboards/, uploads limited."
    from cvops.serving.server import gunicorn_options
    from cvops.settings import ServiceSettings
    render_nginx(tmp_path)
    conf = re.sub(r"#[^\n]*", "", (tmp_path / "conf.d" / "default.conf").read_text())
    env = environment(compose()["services"]["dl_service"], dotenv())
    service = ServiceSettings(root=REPO, _env_file=None, max_upload_bytes=int(env["MAX_UPLOAD_BYTES"]))
    upstream = block(conf, "upstream dl_service")
    nginx_keepalive = int(re.search(r"keepalive_timeout\s+(\d+)s;", upstream)[1])
    assert nginx_keepalive < gunicorn_options(service)["keepalive"], (nginx_keepalive, gunicorn_options(service)["keepalive"])
    assert re.search(r"\bkeepalive\s+\d+;", upstream)
    server = block(conf, "server {")
    assert "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;" in server
    assert "proxy_set_header X-Real-IP $remote_addr;" in server
    assert "access_log /dev/stdout" in server
    assert re.search(r"limit_req_zone \$binary_remote_addr zone=cvops_api:\d+m rate=\d+r/s;", conf)
    assert "limit_req_status 429;" in conf
    for route in ("/predict", "/feedback"):
        assert re.search(r"limit_req zone=cvops_api burst=\d+ nodelay;", block(server, f"location = {route} ")), route
    admin = block(server, "location = /models/current ")
    assert re.search(r"limit_except GET \{\s*deny all;\s*\}", admin), admin
    assert "return 403;" in block(server, "location = /metrics ")
    dash = block(server, "location /dashboards/ ")
    assert "auth_basic " in dash and f"auth_basic_user_file {tmp_path}/htpasswd;" in dash and "proxy_pass http://dashboards;" in dash
    size = re.search(r"client_max_body_size (\d+)m;", server)
    assert size and int(size[1]) * 1024 * 1024 > service.max_upload_bytes
    assert f"FORWARDED_ALLOW_IPS" in env and env["FORWARDED_ALLOW_IPS"] == compose()["services"]["nginx"]["networks"]["default"]["ipv4_address"]


def test_dashboard_htpasswd_script_refuses_sample_passwords(tmp_path):
    out = tmp_path / "htpasswd"
    for user, password in (("viewer", "change-me-dashboards"), ("viewer", ""), ("a:b", "s3cret-dash"), ("", "s3cret-dash")):
        run = subprocess.run([str(HTPASSWD_SCRIPT)], env={**os.environ, "DASHBOARD_USER": user, "DASHBOARD_PASSWORD": password,
                                                          "DASHBOARD_HTPASSWD": str(out)}, capture_output=True, text=True, timeout=30)
        assert run.returncode != 0 and "DASHBOARD_" in run.stderr and not out.exists(), (user, password, run.stderr)
    run = subprocess.run([str(HTPASSWD_SCRIPT)], env={**os.environ, "DASHBOARD_USER": "viewer", "DASHBOARD_PASSWORD": "pa$$ word'x",
                                                      "DASHBOARD_HTPASSWD": str(out)}, capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    assert out.read_text() == "viewer:{PLAIN}pa$$ word'x\n" and stat.S_IMODE(out.stat().st_mode) == 0o600


# --- PostgreSQL: the init script, twice, on a throw-away cluster ---------------------------------

@pytest.fixture
def pg_with_passwords(tmp_path):
    "A throw-away cluster where the socket is trusted (as the image's init phase is) and TCP asks for scram passwords."
    from cvops.testing import PostgresCluster, postgres_bindir
    if postgres_bindir() is None or shutil.which("psql") is None: need("PostgreSQL (initdb, pg_ctl, psql)", "apt-get install postgresql")
    pg = PostgresCluster(tmp_path)
    try:
        hba = pg.data / "pg_hba.conf"
        hba.write_text("local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n")
        if pg.as_root: shutil.chown(hba, "postgres", "postgres")
        yield pg.start()
    finally:
        pg.remove()


def test_postgres_init_script_twice_one_non_superuser_role_per_tool(pg_with_passwords):
    "Run as the image runs it (superuser over the socket, env from .env with real passwords), twice, over a database the image made already; each role reaches its own database only; `migrate` makes the schema as the cvops role."
    import psycopg2
    pg = pg_with_passwords
    env = dotenv()
    env.update(POSTGRES_USER="postgres", MLFLOW_DB_PASSWORD="ml'flow:p@ss/w%rd 1", CVOPS_DB_PASSWORD='cv"ops p@ss:w0rd/2')
    run_env = {**os.environ, **env, "PGHOST": str(pg.dir), "PGPORT": str(pg.port)}
    run_env.pop("PGPASSWORD", None)
    # the image creates POSTGRES_DB first; pretend it was the prediction log's name (the old script died on that)
    subprocess.run(["psql", "-v", "ON_ERROR_STOP=1", "-U", "postgres", "-d", "postgres", "-c", f'CREATE DATABASE "{env["CVOPS_DB"]}"'],
                   env=run_env, check=True, capture_output=True, timeout=60)
    for attempt in (1, 2):
        run = subprocess.run([str(INIT_SCRIPT)], env=run_env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, f"run {attempt}: {run.stdout}\n{run.stderr}"
    def connect(user, password, db):
        return psycopg2.connect(host="127.0.0.1", port=pg.port, user=user, password=password, dbname=db, connect_timeout=10)
    tools = {"mlflow": (env["MLFLOW_DB_USER"], env["MLFLOW_DB_PASSWORD"], env["MLFLOW_DB"]),
             "cvops": (env["CVOPS_DB_USER"], env["CVOPS_DB_PASSWORD"], env["CVOPS_DB"])}
    for tool, (user, password, db) in tools.items():
        with connect(user, password, db) as conn, conn.cursor() as cur:
            cur.execute("SELECT rolsuper, rolcreatedb, rolcreaterole FROM pg_roles WHERE rolname = current_user")
            assert cur.fetchone() == (False, False, False), tool
            cur.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()")
            assert cur.fetchone() == (user,), f"{tool}: does not own {db}"
            cur.execute("CREATE TABLE t (x int)"); cur.execute("DROP TABLE t")   # it can make its schema
        conn.close()
        with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
            connect(user, password + "x", db)
        other = next(v[2] for k, v in tools.items() if k != tool)
        with pytest.raises(psycopg2.OperationalError, match="permission denied for database"):
            connect(user, password, other)
    # the one-shot migrate service's command and environment, as the cvops role: the schema is made, by its owner
    migrate = compose()["services"]["migrate"]
    menv = environment(migrate, env)
    menv["DB_URL"] = menv["DB_URL"].replace("@postgres:5432/", f"@127.0.0.1:{pg.port}/")
    cvops = Path(sys.executable).parent / migrate["command"][0]
    run = subprocess.run([str(cvops), *migrate["command"][1:]], env={**os.environ, **menv}, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "applied 0001_initial" in run.stdout, run.stdout + run.stderr
    with connect(*tools["cvops"][:2], env["CVOPS_DB"]) as conn, conn.cursor() as cur:
        cur.execute("SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'")
        assert cur.fetchall() == [(env["CVOPS_DB_USER"],)]
    conn.close()
    missing = {k: v for k, v in run_env.items() if k != "CVOPS_DB_PASSWORD"}
    run = subprocess.run([str(INIT_SCRIPT)], env=missing, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "CVOPS_DB_PASSWORD is not set" in run.stderr, run.stderr
