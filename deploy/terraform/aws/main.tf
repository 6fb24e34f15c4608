# swarm-node on AWS: a small on-demand bootstrap instance and an Auto Scaling group of spot GPU instances
# (mixed types, several zones, capacity rebalancing). Both boot from deploy/cloud-init/ and run the
# deploy/systemd/ units. Keys never appear here: every daemon claims a bundle from var.keys_pool.

locals {
  grpc_ports    = [50051, 50131] # swarm-node@gpuN: 50051 + 10 N (up to 8 GPUs)
  dht_ports     = [31337, 31418] # the bootstrap node's 31337, then 31338 + 10 N
  metrics_ports = [9100, 9107]
  pool_bucket   = split("/", trimprefix(var.keys_pool, "s3://"))[0]
  template_vars = {
    swarm_name      = var.swarm_name
    num_stages      = var.num_stages
    steps           = var.steps
    package         = var.package
    keys_pool       = var.keys_pool
    extra_args      = var.extra_args
    durability_args = var.durability_args
  }
  initial_peers = "/ip4/${aws_instance.bootstrap.private_ip}/tcp/31337/p2p/${var.bootstrap_peer_id}"
}

data "aws_ami" "ubuntu" {
  most_recent = true
  owners      = ["099720109477"]
  filter {
    name   = "name"
    values = ["ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-*"]
  }
}

data "aws_ami" "gpu" {
  most_recent = true
  owners      = ["amazon"]
  filter {
    name   = "name"
    values = ["Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04)*"]
  }
}

# only the swarm's ports, only from the swarm's own instances (and admin_cidrs for SSH and metrics)
resource "aws_security_group" "swarm" {
  name_prefix = "swarm-node-${var.swarm_name}-"
  description = "swarm-node ${var.swarm_name}: gRPC, DHT and metrics between members"
  vpc_id      = var.vpc_id

  ingress {
    description = "gRPC (mutual TLS) between daemons"
    from_port   = local.grpc_ports[0]
    to_port     = local.grpc_ports[1]
    protocol    = "tcp"
    self        = true
  }
  ingress {
    description = "hivemind DHT (token-gated)"
    from_port   = local.dht_ports[0]
    to_port     = local.dht_ports[1]
    protocol    = "tcp"
    self        = true
  }
  ingress {
    description = "Prometheus metrics"
    from_port   = local.metrics_ports[0]
    to_port     = local.metrics_ports[1]
    protocol    = "tcp"
    self        = true
    cidr_blocks = var.admin_cidrs
  }
  dynamic "ingress" {
    for_each = length(var.admin_cidrs) > 0 ? [1] : []
    content {
      description = "SSH"
      from_port   = 22
      to_port     = 22
      protocol    = "tcp"
      cidr_blocks = var.admin_cidrs
    }
  }
  egress {
    description = "package install, key pool, peers"
    from_port   = 0
    to_port     = 0
    protocol    = "-1"
    cidr_blocks = ["0.0.0.0/0"]
  }
}

# the instances read the key pool, take leases in it, and look up whether a lease holder still exists
resource "aws_iam_role" "node" {
  name_prefix = "swarm-node-${var.swarm_name}-"
  assume_role_policy = jsonencode({
    Version   = "2012-10-17"
    Statement = [{ Effect = "Allow", Action = "sts:AssumeRole", Principal = { Service = "ec2.amazonaws.com" } }]
  })
}

resource "aws_iam_role_policy" "node" {
  role = aws_iam_role.node.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      { Effect = "Allow", Action = ["s3:ListBucket"], Resource = ["arn:aws:s3:::${local.pool_bucket}"] },
      { Effect = "Allow", Action = ["s3:GetObject", "s3:PutObject"], Resource = ["arn:aws:s3:::${local.pool_bucket}/*"] },
      { Effect = "Allow", Action = ["ec2:DescribeInstances"], Resource = ["*"] },
    ]
  })
}

resource "aws_iam_instance_profile" "node" {
  name_prefix = "swarm-node-${var.swarm_name}-"
  role        = aws_iam_role.node.name
}

resource "aws_instance" "bootstrap" {
  ami                    = data.aws_ami.ubuntu.id
  instance_type          = var.bootstrap_instance_type
  subnet_id              = var.subnet_ids[0]
  vpc_security_group_ids = [aws_security_group.swarm.id]
  iam_instance_profile   = aws_iam_instance_profile.node.name
  key_name               = var.ssh_key_name == "" ? null : var.ssh_key_name
  user_data = templatefile("${path.module}/../../cloud-init/bootstrap.yaml", merge(local.template_vars, {
    initial_peers = ""
  }))
  metadata_options {
    http_tokens = "required"
  }
  tags = { Name = "swarm-node-${var.swarm_name}-bootstrap", "swarm-node/swarm" = var.swarm_name }
}

resource "aws_launch_template" "node" {
  name_prefix            = "swarm-node-${var.swarm_name}-"
  image_id               = var.node_ami_id != "" ? var.node_ami_id : data.aws_ami.gpu.id
  key_name               = var.ssh_key_name == "" ? null : var.ssh_key_name
  vpc_security_group_ids = [aws_security_group.swarm.id]
  iam_instance_profile {
    name = aws_iam_instance_profile.node.name
  }
  user_data = base64encode(templatefile("${path.module}/../../cloud-init/node.yaml", merge(local.template_vars, {
    initial_peers = local.initial_peers
    stage         = "auto"
  })))
  # IMDSv2: the daemons' --preemption auto polls the spot notice there (hop limit 1: not from containers)
  metadata_options {
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }
  tag_specifications {
    resource_type = "instance"
    tags          = { Name = "swarm-node-${var.swarm_name}-node", "swarm-node/swarm" = var.swarm_name }
  }
}

resource "aws_autoscaling_group" "nodes" {
  name_prefix         = "swarm-node-${var.swarm_name}-"
  vpc_zone_identifier = var.subnet_ids
  min_size            = 0
  max_size            = var.swarm_size
  desired_capacity    = var.swarm_size
  capacity_rebalance  = true # start a replacement on a rebalance recommendation, before the 2-minute notice

  mixed_instances_policy {
    instances_distribution {
      on_demand_base_capacity                  = 0
      on_demand_percentage_above_base_capacity = 0
      spot_allocation_strategy                 = "price-capacity-optimized"
    }
    launch_template {
      launch_template_specification {
        launch_template_id = aws_launch_template.node.id
        version            = aws_launch_template.node.latest_version
      }
      dynamic "override" {
        for_each = var.node_instance_types
        content {
          instance_type = override.value
        }
      }
    }
  }

  tag {
    key                 = "swarm-node/swarm"
    value               = var.swarm_name
    propagate_at_launch = true
  }
}
