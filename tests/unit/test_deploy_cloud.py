"""deploy/: the systemd units, cloud-init user-data, Terraform, SkyPilot and k8s files, checked offline with the
tools each format has (systemd-analyze, cloud-init, python-hcl2, terraform, kubernetes-validate)."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tarfile

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SYSTEMD = DEPLOY / "systemd"
UNITS = {"swarm-node-dht.service": "dht", "swarm-node@.service": "run"}
ENV_EXAMPLE = SYSTEMD / "swarm-node.env.example"
CLOUD_INIT = sorted((DEPLOY / "cloud-init").glob("*.yaml"))
TERRAFORM = [DEPLOY / "terraform" / "aws", DEPLOY / "terraform" / "gcp"]
TEMPLATE_VARS = {"swarm_name", "initial_peers", "num_stages", "steps", "keys_pool", "package", "extra_args",
                 "durability_args", "stage"}  # fmt: skip
DRAIN_DEFAULT = 25.0  # swarm-node run --drain-seconds


def unit(name: str) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values, in order]}} (systemd allows repeated keys, which configparser
    refuses)."""
    sections: dict[str, dict[str, list[str]]] = {}
    for section, key, value in _unit_items((SYSTEMD / name).read_text()):
        sections.setdefault(section, {}).setdefault(key, []).append(value)
    return sections


def _unit_items(text: str) -> list[tuple[str, str, str]]:
    items, section = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        items.append((section, key.strip(), value.strip()))
    return items


def env_file(path: pathlib.Path) -> dict[str, str]:
    """KEY=VALUE lines as systemd's EnvironmentFile= reads them (comments skipped, outer quotes removed)."""
    values = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, _, value = line.partition("=")
        values[key.strip()] = " ".join(shlex.split(value)) if value.strip() else ""
    return values


def _tool(name: str) -> str:
    found = shutil.which(name) or next(
        (str(p) for p in [pathlib.Path(sys.executable).parent / name] if p.is_file() and os.access(p, os.X_OK)), None
    )
    if found is None:
        pytest.skip(f"{name} is not installed (.ci/run installs it)")
    return found


# ---------------------------------------------------------------- systemd


def _verify(tmp_path: pathlib.Path, name: str, text: str) -> subprocess.CompletedProcess[str]:
    """systemd-analyze verify on a copy whose ExecStart binary is this venv's swarm-node."""
    binary = pathlib.Path(sys.executable).parent / "swarm-node"
    assert binary.exists(), binary
    path = tmp_path / (name.replace("@.", "@0.") if "@." in name else name)
    path.write_text(text.replace("/opt/swarm-node/venv/bin/swarm-node", str(binary)))
    return subprocess.run(
        [_tool("systemd-analyze"), "verify", "--man=no", str(path)], capture_output=True, text=True, cwd=tmp_path
    )


@pytest.mark.parametrize("name", sorted(UNITS))
def test_unit_passes_systemd_analyze_verify(tmp_path: pathlib.Path, name: str) -> None:
    text = (SYSTEMD / name).read_text()
    check = _verify(tmp_path, name, text)
    assert check.returncode == 0 and not check.stderr.strip(), check.stderr
    # and the check bites: a misspelled setting or a missing binary fails it
    broken = _verify(tmp_path, name, text.replace("KillMode=mixed", "KillMode=mixd"))
    assert broken.returncode != 0 or "mixd" in broken.stderr
    missing = _verify(tmp_path, name, text.replace("/opt/swarm-node/venv/bin/swarm-node", "/nonexistent/swarm-node"))
    assert missing.returncode != 0


@pytest.mark.parametrize("name", sorted(UNITS))
def test_unit_has_what_a_spot_daemon_needs(name: str) -> None:
    u = unit(name)
    service, unit_section = u["Service"], u["Unit"]
    assert "network-online.target" in unit_section["Wants"] and "network-online.target" in unit_section["After"]
    one = {key: values[-1] for key, values in service.items()}
    assert one["Restart"] == "on-failure"
    assert one["KillSignal"] == "SIGTERM" and one["KillMode"] == "mixed"  # p2pd is the daemon's child
    drain = float(env_file(ENV_EXAMPLE)["SWARM_DRAIN_SECONDS"])
    assert drain == DRAIN_DEFAULT
    assert float(one["TimeoutStopSec"]) > drain + 10  # the handoff, then the daemon's own shutdown
    assert int(one["LimitNOFILE"]) >= 65536
    # hardening, with a dedicated user; nothing that hides the GPUs
    assert one["User"] == "swarm-node" and one["StateDirectory"].startswith("swarm-node/")
    for key, value in {"ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
                       "NoNewPrivileges": "yes"}.items():  # fmt: skip
        assert one[key] == value, key
    assert "PrivateDevices" not in service and "DevicePolicy" not in service and "DeviceAllow" not in service
    assert service["EnvironmentFile"][0] == "/etc/swarm-node/swarm-node.env"
    assert u["Install"]["WantedBy"] == ["multi-user.target"]
    # only $VAR words (split by systemd; an empty one is no argument): no ${VAR}, which Terraform's
    # templatefile() would take for its own when cloud-init embeds the unit
    exec_start = one["ExecStart"]
    assert "${" not in (SYSTEMD / name).read_text()
    argv = exec_start.split()
    assert argv[:2] == ["/opt/swarm-node/venv/bin/swarm-node", UNITS[name]]
    assert all(w.startswith(("--", "$", "/")) or w in {"run", "dht"} for w in argv), exec_start


def test_env_example_sets_every_variable_the_units_use() -> None:
    example = env_file(ENV_EXAMPLE)
    for name in UNITS:
        u = unit(name)
        service = u["Service"]
        set_by_unit = {v.split("=", 1)[0] for v in service.get("Environment", [])}
        used = set(re.findall(r"\$([A-Z_][A-Z0-9_]*)", service["ExecStart"][-1]))
        missing = used - set_by_unit - set(example)
        assert not missing, (name, missing)
        # the example must not override what the unit derives from its instance name (EnvironmentFile= wins)
        assert not set_by_unit & set(example), set_by_unit & set(example)
    # the optional groups may be empty (off), the durability flags are named for the operator
    text = ENV_EXAMPLE.read_text()
    assert example["SWARM_DURABILITY_ARGS"] == ""
    for flag in ("--snapshot-to", "--snapshot-every", "--resume", "--storage-endpoint", "AWS_ACCESS_KEY_ID"):
        assert flag in text, flag
    run_exec = unit("swarm-node@.service")["Service"]
    assert "SWARM_STAGE=%i" in run_exec["Environment"] and "SWARM_KEYS=/etc/swarm-node/keys/%i" in run_exec[
        "Environment"]  # fmt: skip
    assert run_exec["EnvironmentFile"][-1] == "-/etc/swarm-node/%i.env"  # the per-instance stage, GPU and ports
    gpu = env_file(SYSTEMD / "gpu0.env.example")
    assert gpu["SWARM_STAGE"] == "auto" and gpu["CUDA_VISIBLE_DEVICES"] == "0"


# ---------------------------------------------------------------- cloud-init


def _render(path: pathlib.Path) -> str:
    values = {"swarm_name": "myswarm", "initial_peers": "/ip4/10.0.0.5/tcp/31337/p2p/QmPeer", "num_stages": "4",
              "steps": "1000", "keys_pool": "s3://bucket/swarm", "package": "swarm-node==0.1.0",
              "extra_args": "--preset tiny", "durability_args": "", "stage": "auto"}  # fmt: skip
    return re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], path.read_text())


@pytest.mark.parametrize("path", CLOUD_INIT, ids=lambda p: p.name)
def test_cloud_init_passes_the_schema(tmp_path: pathlib.Path, path: pathlib.Path) -> None:
    cloud_init = _tool("cloud-init")
    rendered = tmp_path / path.name
    rendered.write_text(_render(path))
    for candidate in (path, rendered):
        check = subprocess.run([cloud_init, "schema", "--config-file", str(candidate)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text(rendered.read_text().replace("runcmd:", "runcmd: 5\nbootcmd:", 1))
    assert subprocess.run([cloud_init, "schema", "--config-file", str(broken)], capture_output=True).returncode != 0


@pytest.mark.parametrize("path", CLOUD_INIT, ids=lambda p: p.name)
def test_cloud_init_embeds_the_units_and_scripts_verbatim(path: pathlib.Path) -> None:
    text = path.read_text()
    assert text.startswith("#cloud-config\n")
    # only Terraform template variables in ${...}; no %{ directives
    assert set(re.findall(r"\$\{([^}]*)\}", text)) <= TEMPLATE_VARS and "%{" not in text
    config = yaml.safe_load(_render(path))
    files = {f["path"]: f["content"] for f in config["write_files"]}
    assert files["/usr/local/sbin/swarm-node-claim-bundle"] == (DEPLOY / "bin/swarm-node-claim-bundle").read_text()
    units = [p for p in files if p.startswith("/etc/systemd/system/")]
    assert units
    for p in units:
        assert files[p] == (SYSTEMD / pathlib.PurePath(p).name).read_text(), p
    env = files["/etc/swarm-node/swarm-node.env"]
    env_keys = {line.split("=", 1)[0] for line in env.splitlines()}
    assert env_keys == set(env_file(ENV_EXAMPLE)), env_keys ^ set(env_file(ENV_EXAMPLE))
    assert any("swarm-node" in u.get("name", "") for u in config["users"] if isinstance(u, dict))
    runcmd = json.dumps(config["runcmd"])
    assert "swarm-node-install" in runcmd and "enable" in (runcmd + json.dumps(files))


def test_claim_bundle_gives_each_daemon_its_own_bundle(tmp_path: pathlib.Path) -> None:
    pool = tmp_path / "pool"
    (pool / "bundles").mkdir(parents=True)
    for name in ("node-0", "node-1"):
        bundle = tmp_path / name
        bundle.mkdir()
        (bundle / "node.pem").write_text(name)
        with tarfile.open(pool / "bundles" / f"{name}.tar.gz", "w:gz") as tar:
            tar.add(bundle, arcname=".")
    script = str(DEPLOY / "bin/swarm-node-claim-bundle")

    def claim(dest: str, holder: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", script, str(pool), str(tmp_path / dest), holder], capture_output=True, text=True)

    first, second = claim("a", "i-1/gpu0"), claim("b", "i-2/gpu0")
    assert (first.stdout.strip(), second.stdout.strip()) == ("node-0", "node-1"), first.stderr + second.stderr
    assert (tmp_path / "a/node.pem").read_text() == "node-0" and (tmp_path / "b/node.pem").read_text() == "node-1"
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o700
    assert claim("a", "i-1/gpu0").stdout.strip() == "node-0"  # a reboot keeps its bundle
    exhausted = claim("c", "i-3/gpu0")
    assert exhausted.returncode == 1 and "no free bundle" in exhausted.stderr


# ---------------------------------------------------------------- Terraform


def _hcl(directory: pathlib.Path) -> dict[str, list]:
    hcl2 = pytest.importorskip("hcl2", reason="python-hcl2 comes with the test extras")
    merged: dict[str, list] = {}
    for tf in sorted(directory.glob("*.tf")):
        with tf.open() as f:
            for key, value in _unquote(hcl2.load(f)).items():
                merged.setdefault(key, []).extend(value)
    return merged


def _unquote(value):
    """python-hcl2 8 keeps the quotes of labels and strings ('"nodes"') and marks blocks; older versions do not."""
    if isinstance(value, dict):
        return {_unquote(k): _unquote(v) for k, v in value.items() if k != "__is_block__"}
    if isinstance(value, list):
        return [_unquote(v) for v in value]
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


@pytest.mark.parametrize("directory", TERRAFORM, ids=lambda d: d.name)
def test_terraform_parses_and_declares_every_variable(directory: pathlib.Path) -> None:
    parsed = _hcl(directory)
    declared = {name for block in parsed["variable"] for name in block}
    text = "\n".join(tf.read_text() for tf in directory.glob("*.tf"))
    used = set(re.findall(r"\bvar\.(\w+)", text))
    assert used and not used - declared, used - declared
    assert not declared - used, f"unused variables: {declared - used}"
    for block in parsed["variable"]:
        for name, body in block.items():
            assert body.get("description"), name
    assert {"swarm_size", "num_stages", "swarm_name", "package", "keys_pool", "bootstrap_peer_id"} <= declared
    locals_ = {k for block in parsed.get("locals", []) for k in block}
    assert not set(re.findall(r"\blocal\.(\w+)", text)) - locals_
    # both setups boot from the cloud-init files, passing exactly their template variables
    for template in ("bootstrap.yaml", "node.yaml"):
        assert f'cloud-init/{template}"' in text, template
    template_vars = next(b["template_vars"] for b in parsed["locals"] if "template_vars" in b)
    passed = set(template_vars) | {"initial_peers", "stage"}
    for path in CLOUD_INIT:
        assert set(re.findall(r"\$\{(\w+)\}", path.read_text())) <= passed, path.name
    assert "hashicorp/" in text and "required_version" in text


def test_terraform_aws_is_a_spot_fleet_with_a_bootstrap() -> None:
    parsed = _hcl(DEPLOY / "terraform/aws")
    resources = {(kind, name): body for block in parsed["resource"] for kind, named in block.items()
                 for name, body in named.items()}  # fmt: skip
    asg = resources[("aws_autoscaling_group", "nodes")]
    assert asg["capacity_rebalance"] is True and "var.subnet_ids" in str(asg["vpc_zone_identifier"])
    assert "var.swarm_size" in str(asg["desired_capacity"])
    policy = asg["mixed_instances_policy"][0]
    distribution = policy["instances_distribution"][0]
    assert distribution["on_demand_percentage_above_base_capacity"] == 0
    assert "var.node_instance_types" in json.dumps(policy["launch_template"])
    bootstrap = resources[("aws_instance", "bootstrap")]
    assert "bootstrap.yaml" in str(bootstrap["user_data"]) and "instance_market_options" not in bootstrap
    group = resources[("aws_security_group", "swarm")]
    ingress = group["ingress"]
    assert all(rule.get("self") is True or "admin_cidrs" in str(rule.get("cidr_blocks")) for rule in ingress)
    assert "0.0.0.0/0" not in json.dumps(ingress)


def test_terraform_gcp_is_a_spot_instance_group() -> None:
    parsed = _hcl(DEPLOY / "terraform/gcp")
    resources = {(kind, name): body for block in parsed["resource"] for kind, named in block.items()
                 for name, body in named.items()}  # fmt: skip
    scheduling = resources[("google_compute_instance_template", "node")]["scheduling"][0]
    assert scheduling["provisioning_model"] == "SPOT" and scheduling["preemptible"] is True
    mig = resources[("google_compute_region_instance_group_manager", "nodes")]
    assert "var.swarm_size" in str(mig["target_size"]) and "var.zones" in str(mig["distribution_policy_zones"])
    assert "0.0.0.0/0" not in json.dumps(resources[("google_compute_firewall", "swarm")])


@pytest.mark.parametrize("directory", TERRAFORM, ids=lambda d: d.name)
def test_terraform_fmt_and_templates_render(tmp_path: pathlib.Path, directory: pathlib.Path) -> None:
    terraform = _tool("terraform")
    env = {**os.environ, "TF_CLI_CONFIG_FILE": os.devnull, "CHECKPOINT_DISABLE": "1"}
    fmt = subprocess.run([terraform, "fmt", "-check", "-diff", str(directory)], capture_output=True, text=True, env=env)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr
    # templatefile() itself (offline, no provider) renders both user-data files
    values = (
        '{swarm_name="s", initial_peers="/ip4/10.0.0.5/tcp/31337/p2p/Qm", num_stages=4, steps=10, '
        'keys_pool="s3://b/p", package="swarm-node==0.1.0", extra_args="", durability_args="", stage="auto"}'
    )
    for path in CLOUD_INIT:
        expr = f'jsonencode(templatefile("{path}", {values}))\n'
        out = subprocess.run([terraform, "console"], input=expr, capture_output=True, text=True, cwd=tmp_path, env=env)
        assert out.returncode == 0, out.stderr
        rendered = json.loads(json.loads(out.stdout))
        assert "SWARM_NAME=s\n" in rendered and "${" not in rendered.replace("$${", "")


# ---------------------------------------------------------------- SkyPilot

SKY_TASK_KEYS = {"name", "workdir", "num_nodes", "resources", "envs", "secrets", "file_mounts", "setup", "run",
                 "config", "service", "volumes", "inputs", "outputs", "event_callback"}  # fmt: skip
SKY_RESOURCE_KEYS = {"cloud", "infra", "region", "zone", "accelerators", "accelerator_args", "cpus", "memory",
                     "instance_type", "use_spot", "job_recovery", "spot_recovery", "disk_size", "disk_tier",
                     "network_tier", "ports", "labels", "any_of", "ordered", "image_id", "autostop",
                     "priority"}  # fmt: skip
SKY_RECOVERY_KEYS = {"strategy", "max_restarts_on_errors", "recover_on_exit_codes"}


def test_skypilot_task() -> None:
    path = DEPLOY / "skypilot/node.yaml"
    try:
        import sky  # type: ignore[import-not-found]
    except ImportError:
        sky = None
    if sky is not None:  # SkyPilot's own parser, when it is installed
        task = sky.Task.from_yaml(str(path))
        assert task.resources and all(r.use_spot for r in task.resources)
    task = yaml.safe_load(path.read_text())
    assert set(task) <= SKY_TASK_KEYS, set(task) - SKY_TASK_KEYS
    resources = task["resources"]
    assert set(resources) <= SKY_RESOURCE_KEYS, set(resources) - SKY_RESOURCE_KEYS
    assert resources["use_spot"] is True
    assert set(resources["job_recovery"]) <= SKY_RECOVERY_KEYS and resources["job_recovery"]["strategy"] in {
        "FAILOVER", "EAGER_NEXT_REGION"}  # fmt: skip
    assert all(isinstance(v, str | int | float) for v in task["envs"].values())
    assert "SWARM_BUNDLE" in task["secrets"] and not task["secrets"]["SWARM_BUNDLE"]  # given at launch only
    # the same command line as the unit: the same flags from the same variables
    run = next(line for line in task["run"].splitlines() if "swarm-node run" in line)
    unit_exec = unit("swarm-node@.service")["Service"]["ExecStart"][-1]
    assert run.split(" run ", 1)[1] == unit_exec.split(" run ", 1)[1]
    unit_vars = set(re.findall(r"\$([A-Z_]+)", unit_exec))
    assert unit_vars <= set(task["envs"]) | {"SWARM_KEYS", "SWARM_EVENTS_FILE", "SWARM_SAVE_DIR"}


# ---------------------------------------------------------------- Kubernetes

K8S = DEPLOY / "k8s"
K8S_VERSION = "1.30.0"


def _manifests() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


def test_k8s_manifests_validate_against_the_schemas() -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate comes with the test extras")
    checked = 0
    for _name, doc in _manifests():
        if doc["kind"] == "Kustomization":
            assert {r for r in doc["resources"]} == {p.name for p in K8S.glob("*.yaml")} - {
                "kustomization.yaml", "secrets.example.yaml"}  # fmt: skip
            continue
        if doc["kind"] == "PodMonitor":  # a CRD: no bundled schema
            assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["spec"]["podMetricsEndpoints"]
            continue
        kv.validate(doc, K8S_VERSION, strict=True)
        checked += 1
    assert checked >= 6
    broken = next(d for _, d in _manifests() if d["kind"] == "StatefulSet")
    broken = json.loads(json.dumps(broken))
    broken["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "long"
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, K8S_VERSION, strict=True)


def test_k8s_nodes_drain_on_spot_and_are_scraped() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for _, d in _manifests() if d["kind"] != "Kustomization"}
    config = docs[("ConfigMap", "swarm-node-env")]["data"]
    assert set(config) <= set(env_file(ENV_EXAMPLE))
    drain = float(config["SWARM_DRAIN_SECONDS"])
    nodes = docs[("StatefulSet", "swarm-node")]["spec"]["template"]
    assert nodes["spec"]["terminationGracePeriodSeconds"] > drain + 10
    assert nodes["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert any("spot" in json.dumps(t).lower() for t in nodes["spec"]["tolerations"])
    container = nodes["spec"]["containers"][0]
    assert container["args"][:3] == ["run", "--stage", "auto"] and "--drain-seconds" in container["args"]
    # keys come from Secrets, never from the image
    volumes = {v["name"]: v for v in nodes["spec"]["volumes"]}
    assert volumes["bundles"]["secret"]["secretName"] == "swarm-node-bundles"
    assert docs[("Service", "swarm-node-dht")]["spec"]["ports"][0]["port"] == 31337
    assert "swarm-node-dht.swarm-node.svc" in config["SWARM_INITIAL_PEERS"]
    assert docs[("PodMonitor", "swarm-node")]["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
