output "initial_peers" {
  description = "The bootstrap multiaddr (SWARM_INITIAL_PEERS; swarm-node status --initial-peers)"
  value       = local.initial_peers
}

output "bootstrap_public_ip" {
  description = "Public address of the bootstrap instance, if it has one"
  value       = aws_instance.bootstrap.public_ip
}

output "autoscaling_group" {
  description = "Name of the spot Auto Scaling group (scale it with swarm_size)"
  value       = aws_autoscaling_group.nodes.name
}
