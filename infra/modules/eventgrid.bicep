// The topic the handler publishes sync events to, in the CloudEvents 1.0 schema the handler
// sends by default (EVENTGRID_SCHEMA=cloudevents).

param env string
param location string
param tags object
@description('The app identity\'s principal id.')
param principalId string

resource topic 'Microsoft.EventGrid/topics@2022-06-15' = {
  name: 'egt-sync-${env}'
  location: location
  tags: tags
  properties: {
    inputSchema: 'CloudEventSchemaV1_0'
    // Entra only: no topic key exists.
    disableLocalAuth: true
  }
}

// roles: the handler publishes events.
resource dataSender 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(topic.id, principalId, 'd5a91429-5739-47e2-a06b-3470a27159e7')
  scope: topic
  properties: {
    // EventGrid Data Sender
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', 'd5a91429-5739-47e2-a06b-3470a27159e7')
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}

output endpoint string = topic.properties.endpoint
