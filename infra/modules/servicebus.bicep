// The Service Bus namespace of one environment and the app's queues. The queue properties are
// the ones the handler and its embedded runtime assume (handler/src/queue/mod.rs, QUEUES).

param env string
param location string
param tags object
@description('The app identity\'s principal id.')
param principalId string

resource namespace 'Microsoft.ServiceBus/namespaces@2022-10-01-preview' = {
  name: 'sb-sync-${env}'
  location: location
  tags: tags
  // Sessions and duplicate detection need Standard or Premium.
  sku: {
    name: 'Standard'
    tier: 'Standard'
  }
  properties: {
    minimumTlsVersion: '1.2'
    // Entra only: no SAS key exists to leak.
    disableLocalAuth: true
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
    deadLetteringOnMessageExpiration: true
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

// roles: the host's triggers receive, complete, abandon and dead-letter; the handler sends
// jobs, retries and dead-letter copies (REST), and operators' dead-letter replays do both.
var roles = [
  '4f6d3b9b-027b-4f4c-9142-0e5a2a2247e0' // Azure Service Bus Data Receiver
  '69a216fc-b8fb-44d8-bc22-1f3c2cd27a39' // Azure Service Bus Data Sender
]

resource grants 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for role in roles: {
  name: guid(namespace.id, principalId, role)
  scope: namespace
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', role)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}]

output id string = namespace.id
output namespaceHost string = '${namespace.name}.servicebus.windows.net'
