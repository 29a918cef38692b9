// The Service Bus namespace of one environment and the app's queues. The queue properties are
// the ones the handler and its embedded runtime assume (handler/src/queue/mod.rs, QUEUES).
//
//   az deployment group create -g rg-sync-<env> -f infra/servicebus.bicep -p env=<env>

@description('Environment name: dev, staging, prod.')
param env string

param location string = resourceGroup().location

resource namespace 'Microsoft.ServiceBus/namespaces@2022-10-01-preview' = {
  name: 'sb-sync-${env}'
  location: location
  // Sessions and duplicate detection need Standard or Premium.
  sku: {
    name: 'Standard'
    tier: 'Standard'
  }
  properties: {
    minimumTlsVersion: '1.2'
  }
}

var queues = [
  {
    name: 'sync-inbound-webhook'
    maxDeliveryCount: 5
    lockDuration: 'PT5M'
    defaultMessageTimeToLive: 'P7D'
    requiresSession: false
    deadLetteringOnMessageExpiration: true
  }
  {
    name: 'sync-inbound-scheduled'
    maxDeliveryCount: 10
    lockDuration: 'PT5M'
    defaultMessageTimeToLive: 'P14D'
    requiresSession: false
    deadLetteringOnMessageExpiration: true
  }
  {
    name: 'sync-outbound'
    maxDeliveryCount: 10
    lockDuration: 'PT5M'
    defaultMessageTimeToLive: 'P7D'
    requiresSession: true
    deadLetteringOnMessageExpiration: true
  }
  {
    name: 'sync-deadletter'
    maxDeliveryCount: 10
    lockDuration: 'PT1M'
    defaultMessageTimeToLive: 'P14D'
    requiresSession: false
    deadLetteringOnMessageExpiration: false
  }
]

resource queue 'Microsoft.ServiceBus/namespaces/queues@2022-10-01-preview' = [for q in queues: {
  parent: namespace
  name: q.name
  properties: {
    maxDeliveryCount: q.maxDeliveryCount
    lockDuration: q.lockDuration
    defaultMessageTimeToLive: q.defaultMessageTimeToLive
    requiresSession: q.requiresSession
    deadLetteringOnMessageExpiration: q.deadLetteringOnMessageExpiration
    // Duplicate detection makes every send idempotent by MessageId; it cannot be turned on later.
    requiresDuplicateDetection: true
    duplicateDetectionHistoryTimeWindow: 'PT10M'
  }
}]

output namespaceHost string = '${namespace.name}.servicebus.windows.net'
