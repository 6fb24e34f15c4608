variable "region" {
  description = "AWS region"
  type        = string
  default     = "us-east-1"
}

variable "vpc_id" {
  description = "VPC of the swarm"
  type        = string
}

variable "subnet_ids" {
  description = "Subnets, one per availability zone: the spot fleet spreads over all of them"
  type        = list(string)
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
  description = "Spot VMs in the fleet: at least num_stages (one daemon per GPU); the rest wait as spares"
  type        = number
  default     = 5
  validation {
    condition     = var.swarm_size >= 1
    error_message = "swarm_size must be at least 1."
  }
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
  description = "s3://BUCKET/PREFIX holding bundles/NAME.tar.gz (one per daemon) and bootstrap/bundles/dht.tar.gz"
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

variable "node_instance_types" {
  description = "Instance types of the spot fleet (mixed instances policy), the same GPU count each"
  type        = list(string)
  default     = ["g5.xlarge", "g6.xlarge", "g4dn.xlarge"]
}

variable "node_ami_id" {
  description = "AMI of the nodes (default: the latest Deep Learning Base OSS Nvidia Driver GPU AMI, Ubuntu 22.04)"
  type        = string
  default     = ""
}

variable "bootstrap_instance_type" {
  description = "On-demand instance type of the bootstrap node"
  type        = string
  default     = "t3.small"
}

variable "ssh_key_name" {
  description = "EC2 key pair for SSH (empty: none)"
  type        = string
  default     = ""
}

variable "admin_cidrs" {
  description = "CIDRs allowed to SSH in and to scrape metrics (Prometheus); empty: none"
  type        = list(string)
  default     = []
}
