# swarm-node on GCP: a small on-demand bootstrap VM and a regional managed instance group of SPOT VMs over
# several zones. Both boot from deploy/cloud-init/ and run the deploy/systemd/ units. Keys never appear here:
# every daemon claims a bundle from var.keys_pool.

locals {
  tag         = "swarm-node-${var.swarm_name}"
  pool_bucket = split("/", trimprefix(var.keys_pool, "gs://"))[0]
  template_vars = {
    swarm_name      = var.swarm_name
    num_stages      = var.num_stages
    steps           = var.steps
    package         = var.package
    keys_pool       = var.keys_pool
    extra_args      = var.extra_args
    durability_args = var.durability_args
  }
  initial_peers = "/ip4/${google_compute_instance.bootstrap.network_interface[0].network_ip}/tcp/31337/p2p/${var.bootstrap_peer_id}"
}

resource "google_service_account" "node" {
  account_id   = substr("swarm-node-${var.swarm_name}", 0, 30)
  display_name = "swarm-node ${var.swarm_name}"
}

# the key pool: read bundles, write leases; compute.viewer: is a lease's holder still there
resource "google_storage_bucket_iam_member" "pool" {
  bucket = local.pool_bucket
  role   = "roles/storage.objectUser"
  member = "serviceAccount:${google_service_account.node.email}"
}

resource "google_project_iam_member" "viewer" {
  project = var.project
  role    = "roles/compute.viewer"
  member  = "serviceAccount:${google_service_account.node.email}"
}

# only the swarm's ports, only between the swarm's VMs (and admin_cidrs for SSH and metrics)
resource "google_compute_firewall" "swarm" {
  name        = "${local.tag}-internal"
  network     = var.network
  source_tags = [local.tag]
  target_tags = [local.tag]
  allow {
    protocol = "tcp"
    ports    = ["50051-50131", "31337-31418", "9100-9107"]
  }
}

resource "google_compute_firewall" "admin" {
  count         = length(var.admin_cidrs) > 0 ? 1 : 0
  name          = "${local.tag}-admin"
  network       = var.network
  source_ranges = var.admin_cidrs
  target_tags   = [local.tag]
  allow {
    protocol = "tcp"
    ports    = ["22", "9100-9107"]
  }
}

resource "google_compute_instance" "bootstrap" {
  name         = "${local.tag}-bootstrap"
  machine_type = var.bootstrap_machine_type
  zone         = var.zones[0]
  tags         = [local.tag]
  boot_disk {
    initialize_params {
      image = "ubuntu-os-cloud/ubuntu-2404-lts-amd64"
    }
  }
  network_interface {
    network    = var.network
    subnetwork = var.subnetwork == "" ? null : var.subnetwork
    access_config {} # an external address for pip and the cloud APIs (or use Cloud NAT and drop it)
  }
  metadata = {
    user-data = templatefile("${path.module}/../../cloud-init/bootstrap.yaml", merge(local.template_vars, {
      initial_peers = ""
    }))
  }
  service_account {
    email  = google_service_account.node.email
    scopes = ["cloud-platform"]
  }
}

resource "google_compute_instance_template" "node" {
  name_prefix  = "${local.tag}-"
  machine_type = var.node_machine_type
  tags         = [local.tag]
  disk {
    source_image = var.node_image
    disk_size_gb = 100
    boot         = true
  }
  network_interface {
    network    = var.network
    subnetwork = var.subnetwork == "" ? null : var.subnetwork
    access_config {} # an external address for pip and the cloud APIs (or use Cloud NAT and drop it)
  }
  dynamic "guest_accelerator" {
    for_each = var.node_accelerator == "" ? [] : [1]
    content {
      type  = var.node_accelerator
      count = var.node_accelerator_count
    }
  }
  scheduling {
    provisioning_model          = "SPOT"
    preemptible                 = true
    automatic_restart           = false
    on_host_maintenance         = "TERMINATE"
    instance_termination_action = "DELETE" # the group recreates it, from a fresh boot
  }
  metadata = {
    user-data = templatefile("${path.module}/../../cloud-init/node.yaml", merge(local.template_vars, {
      initial_peers = local.initial_peers
      stage         = "auto"
    }))
  }
  service_account {
    email  = google_service_account.node.email
    scopes = ["cloud-platform"]
  }
  lifecycle {
    create_before_destroy = true
  }
}

resource "google_compute_region_instance_group_manager" "nodes" {
  name                      = "${local.tag}-nodes"
  region                    = var.region
  base_instance_name        = "${local.tag}-node"
  distribution_policy_zones = var.zones
  target_size               = var.swarm_size
  version {
    instance_template = google_compute_instance_template.node.id
  }
  update_policy {
    type                         = "OPPORTUNISTIC"
    minimal_action               = "REPLACE"
    instance_redistribution_type = "NONE"
    max_surge_fixed              = 0
    max_unavailable_fixed        = length(var.zones)
  }
}
