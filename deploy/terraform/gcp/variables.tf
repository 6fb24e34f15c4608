variable "project" {
  description = "GCP project id"
  type        = string
}

variable "region" {
  description = "GCP region"
  type        = string
  default     = "us-central1"
}

variable "zones" {
  description = "Zones the spot group spreads over"
  type        = list(string)
  default     = ["us-central1-a", "us-central1-b", "us-central1-c"]
}

variable "network" {
  description = "VPC network"
  type        = string
  default     = "default"
}

variable "subnetwork" {
  description = "Subnetwork in var.region (empty: the network's auto subnet)"
  type        = string
  default     = ""
}

variable "swarm_name" {
  description = "Swarm name (the DHT namespace)"
  type        = string
  default     = "myswarm"
}

variable "num_stages" {
  description = "Pipeline stages S"
  type        = number
  default     = 4
}

variable "swarm_size" {
  description = "Spot VMs in the group: at least num_stages (one daemon per GPU); the rest wait as spares"
  type        = number
  default     = 5
}

variable "steps" {
  description = "Stage 0 trains until this many steps are committed"
  type        = number
  default     = 100000
}

variable "package" {
  description = "pip requirement of the package, e.g. swarm-node==0.1.0 or a wheel URL"
  type        = string
  default     = "swarm-node==0.1.0"
}

variable "keys_pool" {
  description = "gs://BUCKET/PREFIX holding bundles/NAME.tar.gz (one per daemon) and bootstrap/bundles/dht.tar.gz"
  type        = string
}

variable "bootstrap_peer_id" {
  description = "Peer id of the bootstrap node's identity (the dht.key in its bundle; see deploy/README.md)"
  type        = string
}

variable "extra_args" {
  description = "Flags every daemon gets (SWARM_EXTRA_ARGS): preset, recovery, data, ..."
  type        = string
  default     = "--preset tiny --recovery checkfree"
}

variable "durability_args" {
  description = "Snapshot flags (SWARM_DURABILITY_ARGS), e.g. --snapshot-to s3://bucket/prefix --snapshot-every 100 --resume"
  type        = string
  default     = ""
}

variable "node_machine_type" {
  description = "Machine type of the spot nodes"
  type        = string
  default     = "g2-standard-4"
}

variable "node_accelerator" {
  description = "GPU type attached to every node (empty: none, e.g. for g2 machine types that bundle one)"
  type        = string
  default     = ""
}

variable "node_accelerator_count" {
  description = "GPUs per node (with node_accelerator)"
  type        = number
  default     = 1
}

variable "node_image" {
  description = "Boot image of the nodes (one with the NVIDIA driver and gcloud)"
  type        = string
  default     = "projects/deeplearning-platform-release/global/images/family/common-cu124-ubuntu-2204-py310"
}

variable "bootstrap_machine_type" {
  description = "Machine type of the on-demand bootstrap VM"
  type        = string
  default     = "e2-small"
}

variable "admin_cidrs" {
  description = "CIDRs allowed to SSH in and to scrape metrics (Prometheus); empty: none"
  type        = list(string)
  default     = []
}
