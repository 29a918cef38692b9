using '../main.bicep'

param env = 'prod'
param planSku = 'EP2'
param maximumInstances = 30
param cosmosServerless = false
param historyRetentionDays = 30
// Who is told when an alert fires.
param alertEmailReceivers = [
  {
    name: 'platform-oncall'
    emailAddress: 'platform-oncall@example.com'
  }
]
