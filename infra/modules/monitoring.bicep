// Application Insights on a Log Analytics workspace. The handler exports its own metrics and
// traces (a custom handler has no language worker to do it), under the app's identity: local
// authentication is off, so nothing without an Entra token can write telemetry here.

param env string
param location string
param tags object
@description('The app identity\'s principal id.')
param principalId string

resource workspace 'Microsoft.OperationalInsights/workspaces@2022-10-01' = {
  name: 'log-sync-${env}'
  location: location
  tags: tags
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: 30
  }
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' = {
  name: 'appi-sync-${env}'
  location: location
  tags: tags
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: workspace.id
    DisableLocalAuth: true
  }
}

// roles: the app sends metrics and traces (Monitoring Metrics Publisher covers all telemetry).
resource metricsPublisher 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(appInsights.id, principalId, '3913510d-42f4-4e42-8a64-420c390055eb')
  scope: appInsights
  properties: {
    // Monitoring Metrics Publisher
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', '3913510d-42f4-4e42-8a64-420c390055eb')
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}

output id string = appInsights.id
// Not a secret: with local authentication off, the instrumentation key alone writes nothing.
output connectionString string = appInsights.properties.ConnectionString
