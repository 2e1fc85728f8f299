# The Kafka cluster Terraform manages configbus's topics and ACLs on, with the community
# provider Mongey/kafka. Written by hand; kafka.tf beside it is generated (generate.py).
#
#   terraform init && terraform plan -var 'bootstrap_servers=["kafka-1:9093"]'
#
# The principal Terraform logs in as needs the cluster's Alter and Describe permissions
# (ACLs) and Create on the topics (in practice a super user), like `configbus acl apply`.

terraform {
  required_version = ">= 1.5"
  required_providers {
    kafka = {
      source  = "Mongey/kafka"
      version = "~> 0.8"
    }
  }
}

variable "bootstrap_servers" {
  description = "Kafka brokers, host:port"
  type        = list(string)
}

variable "sasl_username" {
  description = "SCRAM user Terraform logs in as (empty: no SASL)"
  type        = string
  default     = ""
}

variable "sasl_password" {
  description = "its password (set TF_VAR_sasl_password; never in a file)"
  type        = string
  default     = ""
  sensitive   = true
}

variable "replication_factor" {
  description = "replicas of every configbus topic (CONFIGBUS_REPLICATION_FACTOR)"
  type        = number
  default     = 3
}

variable "min_insync_replicas" {
  description = "min.insync.replicas of every configbus topic (CONFIGBUS_MIN_INSYNC_REPLICAS)"
  type        = number
  default     = 2
}

provider "kafka" {
  bootstrap_servers = var.bootstrap_servers
  tls_enabled       = true
  sasl_mechanism    = "scram-sha512"
  sasl_username     = var.sasl_username
  sasl_password     = var.sasl_password
}
