using '../main.bicep'

param env = 'dev'
param planSku = 'EP1'
param maximumInstances = 5
param cosmosServerless = true
param historyRetentionDays = 30
// Who is told when an alert fires.
param alertEmailReceivers = [
  {
    name: 'platform-oncall'
    emailAddress: 'platform-oncall@example.com'
  }
]
